import sys

from hoster_tasks.cli.main import main

sys.exit(main())
