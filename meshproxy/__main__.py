import gc
import sys

if sys.argv[1:2] == ["run"]:
    # Starting up allocates hundreds of thousands of objects (modules, classes, functions)
    # that live as long as the process: the cyclic collector would scan them again and
    # again (~10 % of the CPU of a start). Off until the proxy serves (cli.run).
    gc.disable()

from meshproxy.cli import main

sys.exit(main())
