from services.stream.service import main

main()
