import sys

from agent.starter import main

sys.exit(main())
