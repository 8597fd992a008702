"""``python train.py`` from a checkout: the training program, `editlab.train` (installed: ``editlab-train``)."""

from editlab.train import main

if __name__ == "__main__":
    main()
