"""Temporary shim while sdxl.py is being written: the SDXL UNet now lives in unet.py."""
from unet import *  # noqa
from unet import _state_problems, _listing  # noqa
