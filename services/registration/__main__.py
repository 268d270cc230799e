from services.registration.bootstrap import main

main()
