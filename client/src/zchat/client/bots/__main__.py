import sys

from zchat.client.botcli import main

sys.exit(main())
