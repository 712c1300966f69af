from services.openai_api.app import main

main()
