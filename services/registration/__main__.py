import sys

from services.registration.supervisor import main

sys.exit(main(sys.argv[1:]))
