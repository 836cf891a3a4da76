"""The install step says what it installs: ``make install`` passes the chosen torch requirement
(``TORCH``) and pip options (``TORCH_INDEX``) to pip, its default is the ``torch==2.13.0`` that CI
installs, and README's install text names both downloads, the CPU-only wheel and the CUDA build.
Every ``make`` here is a dry run (``make -n``) into a throwaway virtualenv path, so nothing is
installed and the ``.installed`` target is always out of date."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def section(title: str) -> str:
    text = readme()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def make_install(tmp_path, *variables: str) -> list[list[str]]:
    """The commands ``make -n install`` would run, split as the shell splits them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH", "TORCH_INDEX", "VENV", "PYTHON")}
    r = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *variables], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """What each ``pip install`` is given, options and requirements (``--quiet`` aside)."""
    return [[w for w in c[c.index("install") + 1:] if w != "--quiet"]
            for c in commands if c[1:4] == ["-m", "pip", "install"]]


def test_make_install_passes_the_chosen_torch_requirement_and_index_to_pip(tmp_path):
    commands = make_install(tmp_path, "TORCH=torch>=2.12,<2.14",
                            "TORCH_INDEX=--index-url https://example.invalid/whl/cpu --no-cache-dir")
    installs = pip_installs(commands)
    torch = [i for i in installs if "torch>=2.12,<2.14" in i]
    assert torch == [["--index-url", "https://example.invalid/whl/cpu", "--no-cache-dir", "torch>=2.12,<2.14"]]
    assert installs.index(torch[0]) < installs.index(["-e", ".[test]"])  # torch first, then nulltext keeps it
    assert not any("torch==2.13.0" in w for c in commands for w in c)
    assert any(c[0] == "echo" and "--index-url https://example.invalid/whl/cpu" in c[1] for c in commands)


def test_make_install_defaults_to_torch_2_13_0_with_pips_own_sources(tmp_path):
    installs = pip_installs(make_install(tmp_path))
    assert ["torch==2.13.0"] in installs  # what CI installs (its pip finds the CPU wheel in a local folder)
    assert not any("--index-url" in i or "--extra-index-url" in i for i in installs)


def test_readmes_make_command_for_the_cpu_wheel_reaches_pip(tmp_path):
    (command,) = re.findall(r'`(make demo TORCH_INDEX="[^"]+")`', section("Quick start"))
    variables = shlex.split(command)[2:]
    installs = pip_installs(make_install(tmp_path, *variables))
    assert ["--index-url", CPU_INDEX, "torch==2.13.0"] in installs


def test_readme_names_the_cpu_only_and_the_gpu_download():
    by_hand = section("Install by hand")
    (block,) = re.findall(r"```bash\n(.*?)```", by_hand, flags=re.S)
    assert f"pip install torch==2.13.0 --index-url {CPU_INDEX}" in block
    text = " ".join(by_hand.split("```")[2].split())  # the paragraph after the block, lines joined
    assert re.search(r"CPU-only machine.*CPU-only wheel: about 190 MB", text)
    assert re.search(r"GPU machine, plain `pip install torch==2.13.0`.*CUDA libraries.*about 2\.7 GB", text)
    assert "pytorch.org" in text and 'TORCH_INDEX="--index-url' in text
    quick = " ".join(section("Quick start").split())
    assert "CUDA build (about 2.7 GB" in quick and "CPU-only wheel (about 190 MB)" in quick
    assert "(CPU)" not in quick  # make demo's default is no CPU build, except where pip is set up for one


def test_the_makefile_says_what_the_default_downloads():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    header = " ".join(line.lstrip("# ") for line in makefile.split("\nTORCH ?=")[0].splitlines())
    assert "CUDA build" in header and "about 2.7 GB" in header and "CPU-only wheel (about 190 MB)" in header
    assert re.search(r"^TORCH \?= torch==2\.13\.0$", makefile, flags=re.M)
    assert re.search(r"^TORCH_INDEX \?=$", makefile, flags=re.M)
    assert f'TORCH_INDEX="--index-url {CPU_INDEX}"' in makefile
