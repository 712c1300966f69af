import asyncio

from services.embed.service import main

asyncio.run(main())
