import asyncio

from services.retrieve.service import main

asyncio.run(main())
