"""Make PyPI's torchvision importable next to CPU torch (run by `make install`; idempotent).

Why: transformers' Qwen3-VL image and video processors import torchvision, but PyPI only has CUDA
builds of it, whose compiled extensions fail to load against CPU torch. The processors use only the
pure-Python transforms, so this removes the CUDA-linked extension modules and bundled CUDA libraries
and guards the two fake-op registrations that torchvision runs even when its extension is missing.
torchaudio and torchcodec (CUDA builds that raise OSError on import) are uninstalled by the Makefile.
torchvision's own ops (nms, roi_align) and its image decoders are then unavailable; nothing here uses them.
"""

from __future__ import annotations

import pathlib
import sysconfig

MARKER = "# qvl: register fakes only when torchvision's extension is present"
GUARD = f"""

{MARKER}
def _qvl_register_fake(qualname):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(qualname)
    return lambda fn: fn
"""


def main() -> None:
    tv = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision"
    if not tv.is_dir():
        raise SystemExit("torchvision is not installed in this environment")
    for name in ("_C.so", "image.so"):
        (tv / name).unlink(missing_ok=True)
    for lib in (tv.parent / "torchvision.libs").glob("*"):
        if lib.name.startswith(("libcudart", "libnvjpeg")):
            lib.unlink()
    meta = tv / "_meta_registrations.py"
    source = meta.read_text()
    if MARKER not in source:
        anchor = "import torchvision.extension  # noqa: F401\n"
        unguarded = '@torch.library.register_fake("torchvision::'
        if anchor not in source or source.count(unguarded) != 2:
            raise SystemExit(f"unexpected layout of {meta}: is this torchvision 0.28?")
        source = source.replace(anchor, anchor + GUARD, 1).replace(unguarded, '@_qvl_register_fake("torchvision::')
        meta.write_text(source)
        for pyc in (tv / "__pycache__").glob("_meta_registrations*.pyc"):
            pyc.unlink()
    print(f"torchvision at {tv} prepared for CPU torch")


if __name__ == "__main__":
    main()
