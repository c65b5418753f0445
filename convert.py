"""python convert.py --hf-path MODEL --mlx-path OUT [-q --q-bits 4 ...]: see `gemma4-mlx convert --help`."""

import sys

from gemma4_mlx.cli import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]])
