from services.cache.service import main

main()
