# Two entry points for a fresh machine with Python 3.11, pip, git and make:
#   make run    install, then run the default recipe (params/toy_cd.yaml) end to end with `dvc repro`
#               and print its report (fastgen report)
#   make test   install, then run the test suite
# Both are idempotent. uv is bootstrapped into .tools/ and installs the locked environment (.venv),
# compiled to bytecode up front (this machine sets PYTHONDONTWRITEBYTECODE: without it every stage
# process recompiles its imports, ~17 s each).

PYTHON ?= python3.11
UV := .tools/bin/uv
RECIPE ?= toy_cd

.PHONY: run test install lint dvcgen clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.9

install: $(UV)
	$(UV) sync --frozen --all-extras --compile-bytecode --python $(PYTHON)
	.venv/bin/python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

run: install
	.venv/bin/python -m stages.dvcgen --check
	PATH="$(CURDIR)/.venv/bin:$$PATH" .venv/bin/dvc repro $(RECIPE)-eval
	.venv/bin/fastgen report $(RECIPE)

test: install
	.venv/bin/python -m pytest -q -n 2 --dist loadgroup

dvcgen: install
	.venv/bin/python -m stages.dvcgen

clean:
	rm -rf outputs mlflow.db
