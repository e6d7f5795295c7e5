"""Skin lesion classification pipeline library.

Importing `lib` sets one process default before torch / xgboost load OpenMP: libgomp's busy-wait
makes CPU threads collapse (10-20x slower, measured on 2 shared cores) when a DataLoader worker or
another job shares the cores, so threads sleep instead (`OMP_WAIT_POLICY=PASSIVE`). It also
keeps albumentations from checking PyPI for a newer version at import time (a network call: none
may happen offline, e.g. in a Kaggle kernel). An explicit environment value wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
