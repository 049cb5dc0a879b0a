import sys

from speechmimic.cli import main

sys.exit(main())
