# The two commands: `make lab` brings up the virtual lab cluster, `make test` runs every test.
# Each first installs what is missing (Debian packages, the venv) and is quiet when it is there.

PACKAGES := $(shell sed -e 's/\#.*//' debian-packages.txt)
VENV := .venv
STAMP := $(VENV)/.installed
# `make lab` boots the node image on the first LAB_NODES nodes of examples/lab.toml.
INVENTORY ?= examples/lab.toml
LAB_NODES ?= 3
PYTEST_ARGS ?=
# Where `vlx` is linked so that the README's bare `vlx ...` commands work (root only).
BINDIR ?= /usr/local/bin

.PHONY: lab test lab-down deps debian-packages vlx-on-path clean

lab: deps vlx-on-path
	$(VENV)/bin/vlx lab up --inventory $(INVENTORY) --nodes $(LAB_NODES)

lab-down: deps
	$(VENV)/bin/vlx lab down

test: deps vlx-on-path
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

deps: debian-packages $(STAMP)

# Link .venv/bin/vlx into BINDIR: made when missing or dangling, left alone when it is ours
# already, never replacing another checkout's vlx or a file we did not make (it says so).
vlx-on-path: $(STAMP)
	@target="$(CURDIR)/$(VENV)/bin/vlx"; link="$(BINDIR)/vlx"; \
	if [ "$$(readlink "$$link" 2>/dev/null)" = "$$target" ]; then :; \
	elif [ "$$(id -u)" != 0 ] && [ ! -w "$(BINDIR)" ]; then \
		echo "vlx is $$target: add $(CURDIR)/$(VENV)/bin to PATH, or run make as root"; \
	elif [ ! -e "$$link" ]; then \
		mkdir -p "$(BINDIR)" && ln -sfn "$$target" "$$link" && echo "linked $$link -> $$target"; \
	else \
		echo "$$link is $$(readlink -f "$$link"), not this checkout's: run $$target" \
		     "(or ln -sf $$target $$link)"; \
	fi

# dpkg-query answers in milliseconds; apt-get runs only when something is missing.
debian-packages:
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(PACKAGES) 2>&1 \
		| awk '/no packages found matching/ {print $$NF; next} !/ install ok installed$$/ {print $$1}'); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
			--no-install-recommends \
			$(PACKAGES) >/dev/null || exit 1; \
	fi

$(STAMP): pyproject.toml
	@[ -x $(VENV)/bin/python ] || python3 -m venv $(VENV)
	@echo "installing virtualinux into $(VENV)"
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info
