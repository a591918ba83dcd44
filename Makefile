# Two entry points; each bootstraps everything it needs from a bare Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo docs test lint typecheck imports pytest alerts faketime postgres anvil bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) anvil
	$(BIN)/python -m talos.demo

test: lint typecheck imports alerts pytest

# The developer docs site (mkdocs.yml), built strictly into a throwaway directory:
# a broken link, a page missing from the nav or a docstring that cannot render fails it.
# `make test` runs the same build (tests/docs/test_docs_site.py).
docs: $(STAMP)
	@site=$$(mktemp -d) && trap 'rm -rf "$$site"' EXIT && \
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$site"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy src

imports: $(STAMP)
	$(BIN)/lint-imports

alerts:
	bash deploy/prometheus/check.sh

# The clock-skew tests run agents under Debian's faketime (installed when missing).
faketime:
	bash .ci/install-faketime.sh

# The registry's PostgreSQL tests start their own cluster from Debian's postgresql
# (installed when missing; in CI they must run, so a failed install fails).
postgres:
	bash .ci/install-postgres.sh

# The anchoring tests run a real local chain (anvil) and compile the contract
# with solcjs, both from npm into .tools/ (installed when missing).
anvil:
	bash .ci/install-anvil.sh

pytest: $(STAMP) faketime postgres anvil
	$(BIN)/pytest -n 2 -q --durations=25

# The long kill -9 soak (docs/soak.md): 10,000 messages both ways through ten kills of each agent.
# Not part of `make test`; TALOS_SOAK_SEED=N replays a run's kill schedule.
soak: $(STAMP)
	$(BIN)/pytest -m soak -s -q -p no:cacheprovider tests/integration/test_soak.py

bench: $(STAMP) postgres anvil
	$(BIN)/python -m benchmarks.core
	$(BIN)/python -m benchmarks.capabilities
	$(BIN)/python -m benchmarks.audit
	$(BIN)/python -m benchmarks.registry
	$(BIN)/python -m benchmarks.anchoring
	$(BIN)/python -m benchmarks.network

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
