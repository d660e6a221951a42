"""Method registry: `-m NAME` -> the method object. Adding a method = one subpackage + one line here."""
from __future__ import annotations

import difflib

from samplan.errors import SamplanError
from samplan.methods.autosam2.method import AutoSAM2Method
from samplan.methods.base import Method
from samplan.methods.medsam.method import MedSAMMethod
from samplan.methods.promise.method import PromiseMethod
from samplan.methods.samunetr.method import SAMUNETRMethod
from samplan.methods.samzeroshot.method import SAMZeroShotMethod
from samplan.methods.unet.method import UNetMethod

METHODS: dict[str, Method] = {
    "unet": UNetMethod(),
    "samunetr": SAMUNETRMethod(),
    "medsam": MedSAMMethod(),
    "samzeroshot": SAMZeroShotMethod(),
    "promise": PromiseMethod(),
    "autosam2": AutoSAM2Method(),
}


def available_methods() -> list[str]:
    """Registered method names in registry order."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The registered method called `name`; SamplanError listing the available names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name).lower(), list(METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise SamplanError(f"unknown method {name!r}. Available methods: {', '.join(METHODS)}.{hint}") from None
