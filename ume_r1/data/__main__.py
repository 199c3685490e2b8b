"""`python -m ume_r1.data check FILES...`: read data files as training would (`ume_r1.data.check`)."""

import sys

from ume_r1.data.check import main

sys.exit(main())
