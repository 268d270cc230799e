from services.enrollment.bootstrap import main

main()
