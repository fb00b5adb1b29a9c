"""The package's structure: one-way dependencies between its layers, no import cycles, no first-party
imports hidden inside functions, and the package installs and runs from outside the checkout."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sfv_jax"

# Layers, lowest first: a module imports from its own layer's package or from lower layers only.
LAYERS = {
    "timing": 0,
    "paths": 0,
    "programs": 0,
    "models": 1,
    "testing": 2,
    "diffusion": 2,
    "checkpoint": 3,
    "parallel": 3,
    "data": 4,
    "training": 5,
    "evaluation": 5,
    "configs": 6,
    "console": 7,
    # commands: thin, on top of everything (one module per console script in cli/; the benchmarks)
    "bench": 8,
    "cli": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(tree: ast.Module, name: str, is_package: bool) -> list[tuple[ast.AST, str]]:
    """(node, imported module) for every import of sfv_jax.* anywhere in the module (``from sfv_jax.a
    import b``: ``sfv_jax.a.b`` when that is a module, else ``sfv_jax.a``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names if a.name.split(".")[0] == "sfv_jax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "sfv_jax":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                target = sub if _is_module(sub) else base
                out.append((node, target))
    return out


def _is_module(dotted: str) -> bool:
    p = REPO.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {
            t
            for node, t in first_party_imports(tree, name, path.name == "__init__.py")
            if node in tree.body and t != name
        }
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_first_party_imports_inside_functions():
    """Module-level imports only: an import inside a function hides a dependency (and a cycle)."""
    hidden = []
    for path in sorted(PKG.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        hidden += [
            f"{path.relative_to(REPO)}:{node.lineno} imports {t}"
            for node, t in first_party_imports(tree, name, path.name == "__init__.py")
            if node not in tree.body
        ]
    assert hidden == []


def _layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else "__init__"
    return top, LAYERS.get(top, -1)


def test_dependencies_run_one_way():
    """Every module's layer is known, and it imports only its own package or lower layers."""
    bad = []
    for mod, deps in _graph().items():
        if mod == "sfv_jax":
            continue
        top, rank = _layer(mod)
        assert rank >= 0, f"{mod}: its top-level name {top!r} has no layer in LAYERS"
        for dep in deps:
            dtop, drank = _layer(dep)
            if dtop != top and drank >= rank:
                bad.append(f"{mod} (layer {rank}) imports {dep} (layer {drank})")
    assert bad == []


def test_installed_package_runs_from_another_folder(tmp_path):
    """``pip install .`` into a fresh environment (its dependencies from this one), then the console
    scripts from a folder outside the checkout: train the tiny config by name for 2 steps, export it,
    sample one video from the export; the package imported is the installed copy."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    # the dependencies: this environment's site-packages as a plain path (its .pth files, among them an
    # editable install of the checkout, are not processed)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    src = tmp_path / "src"  # a copy of the tracked files: building in the checkout would leave build/ there
    for rel in subprocess.check_output(["git", "ls-files"], cwd=REPO, text=True).split():
        if (REPO / rel).is_file() and not (REPO / rel).is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"]
    flags = ["--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
    subprocess.run([*pip, *flags, str(src)], check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import sfv_jax; print(sfv_jax.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where
    assert (Path(where).parent / "assets" / "toy_teacher" / "model_index.json").is_file()  # package data

    def run(*cmd):
        proc = subprocess.run(
            [str(venv / "bin" / cmd[0]), *cmd[1:]], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run("sfv-train", "--config", "tiny", "--workdir", "run", "--config.total_steps=2", "--config.sample_every_steps=0")
    assert (elsewhere / "run" / "train_summary.json").is_file()
    run("sfv-export", "--workdir", "run", "--out", "model")
    from PIL import Image

    Image.new("RGB", (24, 16), (200, 40, 90)).save(elsewhere / "frame.png")
    run(
        "sfv-sample",
        "--model",
        "model",
        "--image",
        "frame.png",
        "--out",
        "video.gif",
        "--height",
        "16",
        "--width",
        "16",
        "--num-frames",
        "4",
    )
    assert (elsewhere / "video.gif").stat().st_size > 0
    bad = subprocess.run(
        [str(venv / "bin" / "sfv-train"), "--config", "nosuch", "--workdir", "w"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --config nosuch") and "tiny" in bad.stderr
    assert not (elsewhere / "w").exists()


@pytest.mark.parametrize("name", ["tiny", "sfv_svd", "eval_tiny", "eval_ucf101"])
def test_packaged_configs_resolve_by_name_and_by_path(name):
    from sfv_jax import configs
    from sfv_jax.console import resolve_config_flags

    path = configs.resolve(name)
    assert Path(path).is_file() and Path(path).parent == PKG / "configs"
    assert resolve_config_flags(["x", "--config", name, f"--config={name}", "--config.seed=3"]) == [
        "x",
        "--config",
        path,
        f"--config={path}",
        "--config.seed=3",
    ]
    assert configs.resolve("configs/tiny.py") == "configs/tiny.py"  # a path stays a path
    with pytest.raises(configs.ConfigNotFound, match="tiny"):
        configs.resolve("tinny")
