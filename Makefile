# clawbridge: make targets. `make` alone lists them.
PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR = $(DESTDIR)$(PREFIX)/bin
UNITDIR = $(DESTDIR)$(PREFIX)/lib/systemd/system
USERUNITDIR = $(DESTDIR)$(PREFIX)/lib/systemd/user
UNITS = $(wildcard systemd/*.service systemd/*.timer)
AGENT_UNITS = $(wildcard systemd/clawagent-*)

.PHONY: help run test pytest lint bench install uninstall clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

run:  ## serve on 127.0.0.1:8787 with data in ./.clawhub
	$(PYTHON) clawbridge.py

# Where there are two cores or more, the suite runs as two pytest processes side by side, each on about half
# of the test files: most tests wait on subprocesses and real time, and the two together take about 100 s
# where one alone takes about 170 s on two cores. The first group's output shows as it runs, the second's in
# full when both are done. A test file not named in TESTS_FIRST runs in the second group. One pytest over
# everything: $(PYTHON) -m pytest -q tests
CPUS := $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') \
	else os.cpu_count() or 1)" 2>/dev/null || echo 1)
TESTS_FIRST = tests/test_store.py tests/test_cli.py tests/test_http.py tests/test_systemd.py tests/test_core.py \
	tests/test_ops.py
TESTS_SECOND = $(filter-out $(TESTS_FIRST),$(sort $(wildcard tests/test_*.py)))

test: pytest  ## install pytest when missing, then run the test suite (two halves side by side)
ifeq ($(CPUS),1)
	$(PYTHON) -m pytest -q tests
else
	@second=$$(mktemp); \
	$(PYTHON) -m pytest -q -p no:cacheprovider $(TESTS_SECOND) > "$$second" 2>&1 & pid=$$!; \
	$(PYTHON) -m pytest -q -p no:cacheprovider $(TESTS_FIRST); first=$$?; \
	wait $$pid; status=$$?; cat "$$second"; rm -f "$$second"; \
	[ $$first -eq 0 ] && [ $$status -eq 0 ]
endif

# pytest is all the tests need; where pip refuses to touch the system Python (PEP 668), it goes to ~/.local
pytest:
	@$(PYTHON) -c "import pytest" 2>/dev/null || $(PYTHON) -m pip install --quiet pytest 2>/dev/null \
	  || $(PYTHON) -m pip install --quiet --user --break-system-packages pytest

lint: pytest  ## syntax check, and the tests that both programs are Python 3.9 and standard library only
	$(PYTHON) -m py_compile clawbridge.py clawagent.py
	$(PYTHON) -m pytest -q tests/test_cli.py -k "standard_library or python_3_9"

bench:  ## performance benchmarks (tests/bench), ratios against a bare http.server, table with PASS/FAIL
	$(PYTHON) tests/bench/run.py

install:  ## install both programs and the systemd units under PREFIX (DESTDIR for staging)
	install -d $(BINDIR) $(UNITDIR) $(USERUNITDIR)
	install -m 0755 clawbridge.py $(BINDIR)/clawbridge.py
	install -m 0755 clawagent.py $(BINDIR)/clawagent.py
	$(PYTHON) -m py_compile $(BINDIR)/clawagent.py    # scheduled beats run it as a module: no compile per beat
	for unit in $(UNITS); do \
	  sed 's#/usr/local/bin/#$(PREFIX)/bin/#g' "$$unit" > $(UNITDIR)/$$(basename $$unit) || exit 1; \
	  chmod 0644 $(UNITDIR)/$$(basename $$unit); \
	done
	for unit in $(AGENT_UNITS); do cp $(UNITDIR)/$$(basename $$unit) $(USERUNITDIR)/ || exit 1; done

uninstall:  ## remove what install put in place
	rm -f $(BINDIR)/clawbridge.py $(BINDIR)/clawagent.py $(BINDIR)/__pycache__/clawagent.*.pyc
	for unit in $(UNITS); do rm -f $(UNITDIR)/$$(basename $$unit) $(USERUNITDIR)/$$(basename $$unit); done

clean:  ## remove caches and the local data dir of `make run`
	rm -rf .pytest_cache tests/__pycache__ tests/bench/__pycache__ __pycache__ .clawhub
