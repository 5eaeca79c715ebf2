# The two commands: `make lab` brings up the virtual lab cluster, `make test` runs every test.
# Each first installs what is missing (Debian packages, the venv) and is quiet when it is there.

PACKAGES := $(shell sed -e 's/\#.*//' debian-packages.txt)
VENV := .venv
STAMP := $(VENV)/.installed
INVENTORY ?= examples/cluster.toml
PYTEST_ARGS ?=

.PHONY: lab test lab-down deps debian-packages clean

lab: deps
	$(VENV)/bin/vlx lab up --inventory $(INVENTORY)

lab-down: deps
	$(VENV)/bin/vlx lab down

test: deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

deps: debian-packages $(STAMP)

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
