"""Every package tested in its own virtualenv, plus lint, parity, bench and demo.

    nox                          every package's tests, then lint (what CI runs)
    nox -s "tests(sd-vae)"       one package's tests (or: nox -t vae)
    nox -s lint                  ruff, and the package-independence / copied-module check
    nox -s parity                the slow full-size parity tests against the references
    nox -s bench -- --help       benchmarks against diffusers (not tests)
    nox -s demo -- "a prompt"    generate a picture with the bundled model

Each session installs only the package under test, its test extras and the siblings it
declares, all from the local packages/ folder in one pip call, so a package that imports a
sibling it does not declare fails its own run. torch is pinned by constraints.txt to the CPU
build on this machine's disk.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / "constraints.txt")
PACKAGES = {
    # package: (tag, siblings it declares)
    "sd-vae": ("vae", ()),
    "sd-clip": ("clip", ()),
    "sd-unet": ("unet", ()),
    "sd-samplers": ("samplers", ()),
    "sd-controlnet": ("controlnet", ()),
    "sd-lora": ("lora", ()),
    "sd-pipeline": (
        "pipeline",
        ("sd-vae", "sd-clip", "sd-unet", "sd-samplers", "sd-lora", "sd-controlnet"),
    ),
    "sd-server": (
        "server",
        ("sd-pipeline", "sd-vae", "sd-clip", "sd-unet", "sd-samplers", "sd-lora", "sd-controlnet"),
    ),
}
# Test-only references that must be installed without their dependencies: k-diffusion 0.1.1
# requires torchvision, scikit-image, wandb, ...; its sampling and external modules need none.
NO_DEPS_TEST_EXTRAS = {"sd-samplers": ["k-diffusion==0.1.1"]}

nox.options.sessions = [f"tests({name})" for name in PACKAGES] + ["lint"]
nox.options.error_on_missing_interpreters = True


def _install_package(session: nox.Session, name: str, extras: str = "[test]") -> None:
    _, siblings = PACKAGES[name]
    paths = [f"{ROOT / 'packages' / name}{extras}"]
    paths += [str(ROOT / "packages" / sibling) for sibling in siblings]
    session.install("-c", CONSTRAINTS, *paths)
    if name in NO_DEPS_TEST_EXTRAS:
        session.install("--no-deps", *NO_DEPS_TEST_EXTRAS[name])


def _package_params(tagged: bool):
    """One parameter per package; the tests sessions carry the package's tag (`nox -t vae`)."""
    return [
        nox.param(name, id=name, tags=[tag] if tagged else [])
        for name, (tag, _) in PACKAGES.items()
    ]


@nox.session
@nox.parametrize("package", _package_params(tagged=True))
def tests(session: nox.Session, package: str) -> None:
    """One package's fast test suite, in a virtualenv holding only what it declares."""
    _install_package(session, package)
    session.chdir(ROOT / "packages" / package)
    session.run("pytest", "-q", *session.posargs)


@nox.session
@nox.parametrize("package", _package_params(tagged=False))
def parity(session: nox.Session, package: str) -> None:
    """The slow tests: full SD 1.5 size parity against diffusers/transformers/k-diffusion."""
    _install_package(session, package)
    session.chdir(ROOT / "packages" / package)
    session.run("pytest", "-q", "-m", "slow", *session.posargs, success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check; component independence; copied modules in sync."""
    session.install("ruff>=0.5", "pytest>=7")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("python", "tools/check_packages.py")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tools")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side timings against diffusers (not tests): `nox -s bench -- --help`."""
    session.install("-c", CONSTRAINTS, *(str(ROOT / "packages" / p) for p in PACKAGES))
    session.install("-c", CONSTRAINTS, "diffusers", "transformers>=5")
    if "--sdcpp" in session.posargs:  # builds stable-diffusion.cpp from source (CMake)
        session.install("-c", CONSTRAINTS, "stable-diffusion-cpp-python")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: generate a picture with the bundled model (`nox -s demo -- "prompt"`)."""
    _install_package(session, "sd-pipeline", extras="")
    args = session.posargs or ["a red circle on a blue background", "-o", "outputs/"]
    session.run("sd-generate", *args)
