# capsearch: `make run` and `make test` do all the set-up on a fresh machine (python3 >= 3.10, pip).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-slow lint format venv clean paper paper-report search search-followups search-report

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[cpu,test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/capsearch run search_spaces/tiny.yaml

# The paper's tables in the phantom world's memorising regime (docs/results.md): Table 1 on seeds 0, 1
# and 3, then Table 2 on seed 0, each run in runs/ and resumed where a previous call stopped; each run's
# records (no weights) are copied to experiments/results/paper/ when it ends. About 2.5 hours a run here.
PAPER_RUNS := paper_table1 paper_table1_seed1 paper_table1_seed3 paper_table2
PAPER := experiments/results/paper

# Each experiments/<name>.yaml of $(1) run into runs/<name> (--resume where a previous call stopped),
# its records (no weights) then kept in $(2)/<name>.
define run_and_keep
	for s in $(1); do \
	  out=runs/$$s; flag=; [ -f $$out/spec.yaml ] && flag=--resume; \
	  $(BIN)/capsearch run experiments/$$s.yaml --out $$out $$flag || exit 1; \
	  $(BIN)/python experiments/keep_records.py $$out $(2)/$$s || exit 1; \
	done
endef

paper: $(STAMP)
	$(call run_and_keep,$(PAPER_RUNS),$(PAPER))
	$(MAKE) paper-report

# The tables, verdicts and plots again from the committed records (seconds).
paper-report: $(STAMP)
	$(BIN)/capsearch report $(PAPER)/paper_table1 $(PAPER)/paper_table1_seed1 $(PAPER)/paper_table1_seed3 --out $(PAPER)/table1
	$(BIN)/capsearch report $(PAPER)/paper_table1 $(PAPER)/paper_table2 --out $(PAPER)/table2

# The search against the baselines (docs/results.md, "Search against the baselines"): TPE, then the same
# search with a random sampler; both reuse Table 1 seed 0's baselines from runs/paper_table1, which must
# exist (`make paper` makes it; a copy of experiments/results/paper/paper_table1, records without weights,
# serves too: the baselines then train here). Resumes where a previous call stopped; records (no weights) go to
# experiments/results/search/ as each run ends. About 3.5 hours a run here.
SEARCH_RUNS := search_vs_baselines search_random
SEARCH := experiments/results/search

search: $(STAMP)
	$(call run_and_keep,$(SEARCH_RUNS),$(SEARCH))

# Its follow-ups, written from the search's records by experiments/search_followups.py: the winner on
# seeds 1 and 3, Full FT at the winner's rate on seeds 0, 1 and 3, the transfer world, the stops check.
SEARCH_FOLLOWUPS := search_confirm_seed1 search_confirm_seed3 search_control_seed0 search_control_seed1 \
	search_control_seed3 search_transfer search_stops
CONFIRM := $(PAPER)/paper_table1_seed1 $(SEARCH)/search_confirm_seed1 $(PAPER)/paper_table1_seed3 \
	$(SEARCH)/search_confirm_seed3
CONTROLS := $(SEARCH)/search_control_seed0 $(SEARCH)/search_control_seed1 $(SEARCH)/search_control_seed3

search-followups: $(STAMP)
	$(call run_and_keep,$(SEARCH_FOLLOWUPS),$(SEARCH))

# The comparison and the control again from the committed records, each part once its runs are there.
# A follow-up counts once its report.md is (a run writes it when it finishes): a run's records can be
# committed half-way, to go on elsewhere with --resume, without breaking this target.
finished = $(if $(wildcard $(SEARCH)/$(1)/report.md),$(2) $(SEARCH)/$(1))
search-report: $(STAMP)
	$(BIN)/python experiments/search_compare.py $(SEARCH)/search_vs_baselines \
	  $(call finished,search_random) --out $(SEARCH)/compare --confirm $(CONFIRM) \
	  $(call finished,search_stops,--stops) $(call finished,search_transfer,--transfer)
	$(if $(filter 3,$(words $(wildcard $(CONTROLS)))),$(BIN)/python experiments/search_control.py \
	  $(SEARCH)/search_vs_baselines --out $(SEARCH)/compare --confirm $(CONFIRM) --control $(CONTROLS))

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu" --durations=0

lint: $(STAMP)
	$(BIN)/ruff check capsearch tests experiments
	$(BIN)/ruff format --check capsearch tests experiments

format: $(STAMP)
	$(BIN)/ruff format capsearch tests experiments
	$(BIN)/ruff check --fix capsearch tests experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
