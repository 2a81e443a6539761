# KIWIspray. `make serve` runs the stack, `make test` runs every test.
# Both install what they need (Debian packages, the Rust toolchain's
# components) when it is missing.

PORT ?= 5000
ROOT ?= $(CURDIR)
CARGO ?= cargo
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get -y -q

# Debian packages per purpose.
SERVE_PKGS = nginx
TEST_PKGS = nginx curl dnsmasq qemu-system-x86 ipxe ipxe-qemu ovmf busybox-static xz-utils cpio iproute2
BENCH_PKGS = nginx wrk curl

.PHONY: all build serve test test-unit test-e2e lint fmt bench deps-build deps-serve deps-test deps-bench clean

all: build

# Installs Debian packages whose commands are missing. $(1): packages.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
		$(APT_GET) update >/dev/null && $(APT_GET) install --no-install-recommends $$missing; \
	fi
endef

deps-build:
	@command -v $(CARGO) >/dev/null 2>&1 || { \
		echo "installing cargo"; $(APT_GET) update >/dev/null && $(APT_GET) install cargo; }

deps-serve: deps-build
	$(call apt_install,$(SERVE_PKGS))

deps-test: deps-build
	$(call apt_install,$(TEST_PKGS))
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt

deps-bench: deps-build
	$(call apt_install,$(BENCH_PKGS))

build: deps-build
	$(CARGO) build --release --locked

serve: deps-serve build
	PORT=$(PORT) ROOT=$(ROOT) ./nginx/serve.sh

lint: deps-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Unit tests and the integration tests through real nginx.
test-unit: deps-test
	$(CARGO) test --locked

# Real firmware: QEMU guests, iPXE, dnsmasq and nginx in a network namespace.
test-e2e: deps-test build
	./tests/e2e/run.sh

test: lint test-unit test-e2e

bench: deps-bench build
	./tests/bench/run.sh

clean:
	$(CARGO) clean
