import asyncio

from services.ingest.service import main

asyncio.run(main())
