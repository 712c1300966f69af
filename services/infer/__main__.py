import asyncio

from services.infer.service import main

asyncio.run(main())
