"""`smolvm image build|ls|rm`: the root images VMs boot from (SmolVM(image=NAME))."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from ._common import EXIT_USAGE, add_command, fail, listed, print_json


def cmd_image_build(args: argparse.Namespace) -> int:
    from ..build.image import DEFAULT_IMAGE, ImageError, default_packages, ensure_image

    packages = [p for group in args.packages for item in group for p in item.replace(",", " ").split()]
    try:
        if args.name == DEFAULT_IMAGE:
            if packages:
                return fail("'default' is the built-in image; give a custom image another name", EXIT_USAGE,
                            "smolvm image build")  # fmt: skip
            path = ensure_image()
        else:
            if not packages:
                return fail(f"name the packages, e.g. `smolvm image build {args.name} "
                            f"--packages {' '.join(default_packages()[:3])} nodejs`", EXIT_USAGE,
                            "smolvm image build")  # fmt: skip
            if args.no_defaults:
                path = ensure_image(args.name, packages)
            else:
                path = ensure_image(args.name, sorted(set(default_packages()) | set(packages)))
    except (ImageError, ValueError, TypeError) as e:
        return fail(str(e), 1, "smolvm image build")
    if args.json:
        print_json({"name": args.name, "path": str(path)}, indent=None)
    else:
        print(path)
    return 0


def _images() -> list[dict[str, Any]]:
    from ..build.image import built_images

    out = []
    for done, name, folder in built_images():
        try:
            meta = json.loads((folder / "image.json").read_text())
        except (OSError, ValueError):
            meta = {}
        out.append({
            "name": name, "path": str(folder / "rootfs.ext4"), "built_at": done,
            "size_mib": round((folder / "rootfs.ext4").stat().st_size / (1 << 20), 1),
            "packages": meta.get("packages", []),
        })  # fmt: skip
    return out


def cmd_image_ls(args: argparse.Namespace) -> int:
    images = _images()
    if listed(args.json, "images", images,
              "no images built yet: `smolvm image build default` (or the first SmolVM()) builds one"):  # fmt: skip
        return 0
    print(f"{'NAME':<20} {'SIZE':>9}  PACKAGES")
    for im in images:
        pk = " ".join(im["packages"])
        print(f"{im['name']:<20} {im['size_mib']:>7.0f}Mi  {pk[:70] + ('...' if len(pk) > 70 else '')}")
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    rc = 0
    images = _images()
    for name in args.names:
        found = [im for im in images if im["name"] == name]
        if not found:
            known = ", ".join(sorted({im["name"] for im in images})) or "none"
            rc = fail(f"no image named {name!r} (images: {known})", 1, "smolvm image rm")
            continue
        for im in found:
            shutil.rmtree(Path(im["path"]).parent, ignore_errors=True)
        print(f"deleted image {name} (snapshots taken with it can no longer be restored)")
    return rc


def add_parser(sub: Any) -> None:
    im = sub.add_parser("image", help="root images: build, ls, rm")
    isub = im.add_subparsers(dest="image_cmd", required=True)
    ib = add_command(
        isub, "build", cmd_image_build, "build a Debian root image (the default one, or NAME with extra packages)",
        description="Builds Debian bookworm with mmdebstrap (needs the Debian mirror) into "
        "$SMOLVM_HOME/images; cached by the hash of its inputs. Use it with SmolVM(image=NAME).",
    )  # fmt: skip
    ib.add_argument("name", metavar="NAME", nargs="?", default="default")
    ib.add_argument("--packages", nargs="+", action="append", default=[], metavar="PKG",
                    help="Debian packages on top of the default image's")
    ib.add_argument("--no-defaults", action="store_true",
                    help="only the named packages (plus Debian's essential set), not the default image's")
    ib.add_argument("--json", action="store_true", help="machine-readable output")
    add_command(isub, "ls", cmd_image_ls, "list built images", json_help='machine-readable: {"images": [...]}')
    ir = add_command(isub, "rm", cmd_image_rm, "delete images")
    ir.add_argument("names", nargs="+", metavar="NAME")
