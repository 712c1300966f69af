import asyncio

from services.trainer.service import main

asyncio.run(main())
