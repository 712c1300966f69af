import asyncio

from services.monitor.service import main

asyncio.run(main())
