"""``python run.py`` from a checkout: the editing program, `editlab.run` (installed: ``editlab-run``)."""

from editlab.run import main

if __name__ == "__main__":
    main()
