"""`peft` is an oracle for the tests, never a dependency of the library."""

import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "lorakit"


def test_no_module_under_src_imports_peft():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}: {n}" for n in names if n == "peft" or n.startswith("peft.")]
    assert not offenders


def test_importing_and_using_lorakit_never_loads_peft():
    code = (
        "import sys, torch, lorakit\n"
        "m = lorakit.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), lorakit.LoraConfig(target_modules=['0']))\n"
        "m(torch.randn(2, 4))\n"
        "assert 'peft' not in sys.modules, 'peft was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
