# Two commands do everything: `make lab` (set up if needed, open JupyterLab) and `make test` (set up if needed, run
# every unit test and notebook). Set-up is scripts/bootstrap.sh: it uses an interpreter that already has everything,
# or creates/completes the virtual environment .venv.
SHELL := /bin/bash
PYTEST_ARGS ?=
# what to run; a subset splits the suite, e.g. make test TEST_PATHS="tests notebooks/00_setup_and_roofline.ipynb"
TEST_PATHS ?= tests notebooks
# worker processes (pytest-xdist, a test file or notebook each at a time): 2 on a CPU machine with 2 cores or more,
# so that both cores stay busy where a test is single-threaded Python (tests/conftest.py gives each worker its share
# of torch's threads); none where there is an NVIDIA GPU, whose measurements need the device to themselves
TEST_WORKERS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),0,$(if $(filter 0 1,$(shell nproc 2>/dev/null || echo 1)),0,2))
TEST_CMD = -m pytest $(TEST_PATHS) --nbval-lax --nbval-current-env --nbval-sanitize-with tests/sanitize.cfg \
	-p no:cacheprovider --durations=12 $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) \
	$(PYTEST_ARGS)

# JupyterLab refuses to run as root without --allow-root (containers and cloud notebooks run as root), and without a
# display there is no browser to open: it prints the URL with its token instead. LAB_ARGS adds options (e.g. --port).
LAB_UID ?= $(shell id -u)
LAB_FLAGS = $(if $(filter 0,$(LAB_UID)),--allow-root) $(if $(DISPLAY)$(WAYLAND_DISPLAY),,--no-browser)
LAB_ARGS ?=

.PHONY: lab test setup doctor student report strip clean workshop-check

setup:
	@bash scripts/bootstrap.sh >/dev/null

lab:
	@PY=$$(bash scripts/bootstrap.sh) && echo "jupyter lab $(strip $(LAB_FLAGS) $(LAB_ARGS)) (stop with Ctrl-C)" >&2 \
		&& exec $$PY -m jupyter lab $(LAB_FLAGS) $(LAB_ARGS) --ServerApp.root_dir=notebooks

test:
	@PY=$$(bash scripts/bootstrap.sh) && $$PY -m labkit doctor --no-measure && $$PY $(TEST_CMD)

doctor:
	@PY=$$(bash scripts/bootstrap.sh) && $$PY -m labkit doctor

student:
	@PY=$$(bash scripts/bootstrap.sh) && $$PY -m labkit student --out student

# before a workshop: every notebook's student copy fails only at its exercise checks (runs every notebook)
workshop-check:
	@PY=$$(bash scripts/bootstrap.sh) && LABKIT_WORKSHOP=all $$PY -m pytest tests/test_workshop.py -p no:cacheprovider -v

report:
	@PY=$$(bash scripts/bootstrap.sh) && $$PY -m labkit report

# strip outputs from every notebook (the git filter does this on commit once `nbstripout --install` ran)
strip:
	@PY=$$(bash scripts/bootstrap.sh) && $$PY -m nbstripout notebooks/*.ipynb

clean:
	rm -rf .venv student .pytest_cache
