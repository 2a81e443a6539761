# KIWIspray. `make serve` runs the stack, `make test` runs every test.
# Both install what they need (Debian packages, the Rust toolchain's
# components) when it is missing.

PORT ?= 5000
ROOT ?= $(CURDIR)
CARGO ?= cargo
APT_GET = DEBIAN_FRONTEND=noninteractive apt-get -y -q

# Debian packages per purpose.
SERVE_PKGS = $(if $(filter lighttpd,$(WEB)),lighttpd,nginx)
TEST_PKGS = nginx curl wrk dnsmasq qemu-system-x86 ipxe ipxe-qemu ovmf busybox-static xz-utils cpio iproute2 xorriso \
	lighttpd rpm systemd git prometheus chromium chromium-driver \
	mmdebstrap fdisk e2fsprogs dosfstools mtools python3-pip \
	openipmi ipmitool python3-venv openssl grub-common \
	shim-signed shim-unsigned grub-efi-amd64-signed grub-efi-amd64-bin qemu-system-arm qemu-efi-aarch64
# The e2e's cache; the GRUB lane takes Debian's signed ARM64 network GRUB
# (grub-efi-arm64-signed, an arm64 package) from it, extracted there.
E2E_CACHE ?= /var/cache/kiwispray-e2e
GRUB_ARM64_DIR = $(E2E_CACHE)/grub-efi-arm64-signed
GRUB_ARM64_EFI = $(GRUB_ARM64_DIR)/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed
RPM_PKGS = rpm
BENCH_PKGS = nginx wrk curl

.PHONY: all build serve serve-edge test test-unit test-bench-smoke test-e2e demo lint fmt bench deps-build deps-serve deps-test deps-bench clean man \
	rpm deps-rpm install

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
	@[ -e $(GRUB_ARM64_EFI) ] || { \
		echo "extracting grub-efi-arm64-signed:arm64 into $(GRUB_ARM64_DIR)"; \
		dpkg --print-foreign-architectures | grep -qx arm64 || \
			{ dpkg --add-architecture arm64 && $(APT_GET) update >/dev/null; }; \
		d=$$(mktemp -d) && (cd $$d && apt-get download -q -o APT::Sandbox::User=root grub-efi-arm64-signed:arm64 >/dev/null) && \
		rm -rf $(GRUB_ARM64_DIR) && mkdir -p $(E2E_CACHE) && dpkg -x $$d/grub-efi-arm64-signed_*_arm64.deb $(GRUB_ARM64_DIR); \
		rc=$$?; rm -rf $$d; [ $$rc = 0 ] && [ -e $(GRUB_ARM64_EFI) ]; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@[ -x /var/cache/kiwispray-venv/bin/sushy-emulator ] || { python3 -m venv /var/cache/kiwispray-venv && /var/cache/kiwispray-venv/bin/pip install -q sushy-tools; }

deps-bench: deps-build
	$(call apt_install,$(BENCH_PKGS))

build: deps-build
	$(CARGO) build --release --locked

serve: deps-serve build
	PORT=$(PORT) ROOT=$(ROOT) ./nginx/serve.sh

# An edge server for one rack, in front of the central KIWIspray:
# make serve-edge UPSTREAM=http://HOST:PORT [PORT=5000] [CACHE=DIR]
serve-edge:
	$(call apt_install,nginx)
	UPSTREAM=$(UPSTREAM) PORT=$(PORT) CACHE=$(CACHE) ./nginx/serve-edge.sh

lint: deps-test
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Unit tests, the CLI, reliability and packaging tests, and the HTTP suite
# and the flood test through real nginx (with promtool and headless
# Chromium for /metrics and the fleet page); then the HTTP suites and the
# flood test again through real lighttpd.
test-unit: deps-test
	$(CARGO) test --locked --no-fail-fast
	KIWISPRAY_WEB=lighttpd $(CARGO) test --locked --test http --test install_safety --test flood --test observability

# Real firmware: QEMU guests, iPXE, dnsmasq and nginx in a network namespace.
test-e2e: deps-test build
	./tests/e2e/run.sh

# The whole life cycle on one QEMU guest, narrated (as root): register,
# install with KIWI's real installer, first boot, boot from disk.
demo: deps-test build
	./tests/e2e/demo.sh

# A few seconds of the benchmark on tiny databases: checks that the stack
# survives load and loses no registration (numbers are not judged).
test-bench-smoke: deps-test build
	./tests/bench/run.sh --smoke

# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of query and form
# parsing, MAC/serial/UUID normalisation, templates and database loading:
# the crate in tests/fuzz. cargo fuzz needs nightly flags, which
# RUSTC_BOOTSTRAP=1 allows on the stable toolchain. Each run grows a scratch
# corpus in tests/fuzz/scratch/<target> (the committed seeds in
# tests/fuzz/corpus are only read) and leaves its log and any crashing input
# in tests/fuzz/artifacts/<target>/. `make fuzz FUZZ_TIME=3600` runs longer.
.PHONY: fuzz-smoke fuzz
FUZZ_TARGETS = params identity template database
FUZZ_TIME ?= 300
FUZZ_CARGO = RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
# $(1): seconds per target.
define fuzz_run
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { echo "installing cargo-fuzz"; $(CARGO) install cargo-fuzz --locked; }
	$(CARGO) metadata --locked --format-version 1 --manifest-path tests/fuzz/Cargo.toml >/dev/null
	$(FUZZ_CARGO) build --fuzz-dir tests/fuzz
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p tests/fuzz/scratch/$$t tests/fuzz/artifacts/$$t; log=tests/fuzz/artifacts/$$t/run.log; \
		echo "fuzzing $$t for $(1) s (log: $$log)"; \
		if $(FUZZ_CARGO) run --fuzz-dir tests/fuzz $$t tests/fuzz/scratch/$$t tests/fuzz/corpus/$$t -- \
			-max_total_time=$(1) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 >$$log 2>&1; then \
			grep -E '^Done [0-9]+ runs' $$log || tail -n 3 $$log; \
		else tail -n 60 $$log; echo "fuzz target $$t failed; the input is in tests/fuzz/artifacts/$$t/" >&2; exit 1; fi; \
	done
endef

fuzz-smoke: deps-build
	$(call fuzz_run,15)

fuzz: deps-build
	$(call fuzz_run,$(FUZZ_TIME))

test: lint test-unit fuzz-smoke test-bench-smoke test-e2e

bench: deps-bench build
	./tests/bench/run.sh

# Finished-host /bootstrap of this build against another build's
# kiwispray-fcgi (BASE=dir holding it), measured in turns in one run.
.PHONY: bench-compare
bench-compare: deps-bench build
	@[ -n "$(BASE)" ] || { echo "usage: make bench-compare BASE=/path/to/other/target/release" >&2; exit 2; }
	./tests/bench/compare.sh $(BASE) $(or $(HOSTS),10000)

# The man page, generated from the CLI definition; a test fails when the
# committed page differs.
man: deps-build
	$(CARGO) build --locked --bin kiwispray-hosts --bin kiwispray-fcgi
	mkdir -p man
	./target/debug/kiwispray-hosts --generate-man > man/kiwispray-hosts.1
	./target/debug/kiwispray-fcgi --generate-man > man/kiwispray-fcgi.8

clean:
	$(CARGO) clean
	rm -rf tests/fuzz/target tests/fuzz/artifacts tests/fuzz/scratch

# Install layout (FHS). `make install DESTDIR=... PREFIX=...` is what the
# RPM's %install runs; by hand, `make build && sudo make install` (PREFIX
# /usr/local) followed by `systemd-sysusers` and `systemd-tmpfiles --create`.
# Files an operator edits (configs, the database, the deployment templates)
# are installed only where they do not exist yet. The shipped templates go
# to $(DATADIR)/kiwispray/templates (pristine, replaced on update) and are
# copied once to $(SRVDIR)/templates (the deployment's own); man pages and
# docs are installed where this tree has them.
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
DOCDIR ?= $(DATADIR)/doc/kiwispray
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SRVDIR ?= /srv/kiwispray
BIN_DIR ?= target/release

# Copies $(1) to $(2) with mode $(3) unless $(2) exists.
define install_new
	@if [ -e "$(2)" ] || [ -L "$(2)" ]; then echo "kept $(2)"; else install -m $(3) "$(1)" "$(2)"; fi
endef

install:
	@for b in kiwispray-fcgi kiwispray-hosts; do \
		[ -x "$(BIN_DIR)/$$b" ] || { echo "$(BIN_DIR)/$$b is missing; run make build first" >&2; exit 1; }; done
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
		$(DESTDIR)$(DATADIR)/kiwispray/templates $(DESTDIR)$(DATADIR)/kiwispray/lighttpd \
		$(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/kiwispray/dnsmasq \
		$(DESTDIR)$(SYSCONFDIR)/nginx/conf.d $(DESTDIR)$(SYSCONFDIR)/lighttpd/conf.d \
		$(DESTDIR)$(SRVDIR)/images $(DESTDIR)$(SRVDIR)/templates
	install -m 0755 $(BIN_DIR)/kiwispray-fcgi $(BIN_DIR)/kiwispray-hosts $(DESTDIR)$(BINDIR)/
	sed 's#/usr/bin/kiwispray-fcgi#$(BINDIR)/kiwispray-fcgi#; s#/srv/kiwispray#$(SRVDIR)#g; s#/etc/kiwispray#$(SYSCONFDIR)/kiwispray#g' \
		systemd/kiwispray-fcgi.service > $(DESTDIR)$(UNITDIR)/kiwispray-fcgi.service
	install -m 0644 systemd/kiwispray-fcgi.socket $(DESTDIR)$(UNITDIR)/
	sed 's#/srv/kiwispray#$(SRVDIR)#g' systemd/kiwispray.sysusers > $(DESTDIR)$(SYSUSERSDIR)/kiwispray.conf
	sed 's#/srv/kiwispray#$(SRVDIR)#g' systemd/kiwispray.tmpfiles > $(DESTDIR)$(TMPFILESDIR)/kiwispray.conf
	chmod 0644 $(DESTDIR)$(UNITDIR)/kiwispray-fcgi.service $(DESTDIR)$(SYSUSERSDIR)/kiwispray.conf \
		$(DESTDIR)$(TMPFILESDIR)/kiwispray.conf
	cp -P templates/* $(DESTDIR)$(DATADIR)/kiwispray/templates/
	install -d $(DESTDIR)$(DATADIR)/kiwispray/ui
	install -m 0644 ui/*.* $(DESTDIR)$(DATADIR)/kiwispray/ui/
	@for f in templates/*; do t=$(DESTDIR)$(SRVDIR)/templates/$${f#templates/}; \
		if [ -e "$$t" ] || [ -L "$$t" ]; then echo "kept $$t"; else cp -P "$$f" "$$t"; fi; done
	@# boot/: links to the distribution's iPXE, shim and GRUB binaries, and grub/grub.cfg
	@[ -e $(DESTDIR)$(SRVDIR)/boot ] && echo "kept $(DESTDIR)$(SRVDIR)/boot" || cp -PR boot $(DESTDIR)$(SRVDIR)/boot
	sed 's#/srv/kiwispray#$(SRVDIR)#g; s#/usr/bin/kiwispray-fcgi#$(BINDIR)/kiwispray-fcgi#; s#/usr/share/kiwispray/#$(DATADIR)/kiwispray/#g' \
		lighttpd/kiwispray-cgi.conf > $(DESTDIR)$(DATADIR)/kiwispray/lighttpd/kiwispray-cgi.conf
	@[ -e $(DESTDIR)$(SRVDIR)/known_hosts.json ] || { printf '[]\n' > $(DESTDIR)$(SRVDIR)/known_hosts.json; \
		chmod 0640 $(DESTDIR)$(SRVDIR)/known_hosts.json; }
	@[ -e $(DESTDIR)$(SRVDIR)/kiwispray.json ] || [ -L $(DESTDIR)$(SRVDIR)/kiwispray.json ] || \
		ln -sr $(DESTDIR)$(SYSCONFDIR)/kiwispray/kiwispray.json $(DESTDIR)$(SRVDIR)/kiwispray.json
	@[ -e $(DESTDIR)$(SYSCONFDIR)/kiwispray/kiwispray.json ] || \
		printf '{\n  "discover": false,\n  "placeholder_serials": [],\n  "placeholder_uuids": [],\n  "max_connections": 64\n}\n' \
		> $(DESTDIR)$(SYSCONFDIR)/kiwispray/kiwispray.json
	$(call install_new,dnsmasq/kiwispray.conf,$(DESTDIR)$(SYSCONFDIR)/kiwispray/dnsmasq/kiwispray.conf,0644)
	$(call install_new,dnsmasq/kiwispray-proxy.conf,$(DESTDIR)$(SYSCONFDIR)/kiwispray/dnsmasq/kiwispray-proxy.conf,0644)
	$(call install_new,dnsmasq/kiwispray-ipv6.conf,$(DESTDIR)$(SYSCONFDIR)/kiwispray/dnsmasq/kiwispray-ipv6.conf,0644)
	$(call install_new,dnsmasq/kiwispray-grub.conf,$(DESTDIR)$(SYSCONFDIR)/kiwispray/dnsmasq/kiwispray-grub.conf,0644)
	@sed 's#/srv/kiwispray#$(SRVDIR)#g; s#/usr/share/kiwispray/#$(DATADIR)/kiwispray/#g' nginx/kiwispray.conf > $(DESTDIR)$(SYSCONFDIR)/nginx/conf.d/kiwispray.conf.new
	@sed 's#/srv/kiwispray#$(SRVDIR)#g; s#/usr/share/kiwispray/#$(DATADIR)/kiwispray/#g' lighttpd/kiwispray.conf > $(DESTDIR)$(SYSCONFDIR)/lighttpd/conf.d/kiwispray.conf.new
	@for f in $(DESTDIR)$(SYSCONFDIR)/nginx/conf.d/kiwispray.conf $(DESTDIR)$(SYSCONFDIR)/lighttpd/conf.d/kiwispray.conf; do \
		if [ -e "$$f" ]; then echo "kept $$f (the new version is $$f.new)"; else mv "$$f.new" "$$f"; fi; done
	@for f in man/*.1 man/*.8; do [ -e "$$f" ] || continue; s=$${f##*.}; \
		install -d $(DESTDIR)$(MANDIR)/man$$s && install -m 0644 "$$f" $(DESTDIR)$(MANDIR)/man$$s/; done
	@for f in README.md images/README.md; do [ -e "$$f" ] || continue; \
		install -m 0644 "$$f" $(DESTDIR)$(DOCDIR)/$$(echo "$$f" | tr / -); done

# The source and binary RPMs, built with rpmbuild from `git archive HEAD`
# plus the crates.io dependencies vendored with `cargo vendor` (the build
# itself runs offline). They land under target/rpm/.
RPM_TOPDIR = $(CURDIR)/target/rpm
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

deps-rpm: deps-build
	@command -v rpmbuild >/dev/null 2>&1 || { echo "installing $(RPM_PKGS) (for rpmbuild)"; \
		$(APT_GET) update >/dev/null && $(APT_GET) install --no-install-recommends $(RPM_PKGS); }

rpm: deps-rpm
	@v=$$(git show HEAD:kiwispray.spec | sed -n 's/^Version: *//p'); [ "$$v" = "$(VERSION)" ] || \
		{ echo "kiwispray.spec (at HEAD) has Version $$v but Cargo.toml has $(VERSION)" >&2; exit 1; }
	@git diff --quiet HEAD -- . 2>/dev/null || echo "note: the RPM is built from HEAD; uncommitted changes are not in it"
	rm -rf $(RPM_TOPDIR)/SOURCES $(RPM_TOPDIR)/RPMS $(RPM_TOPDIR)/SRPMS $(RPM_TOPDIR)/BUILD \
		$(RPM_TOPDIR)/BUILDROOT $(RPM_TOPDIR)/tree
	mkdir -p $(RPM_TOPDIR)/SOURCES $(RPM_TOPDIR)/tree
	git archive --format=tar.gz --prefix=kiwispray-$(VERSION)/ \
		-o $(RPM_TOPDIR)/SOURCES/kiwispray-$(VERSION).tar.gz HEAD
	tar -xzf $(RPM_TOPDIR)/SOURCES/kiwispray-$(VERSION).tar.gz -C $(RPM_TOPDIR)/tree
	cd $(RPM_TOPDIR)/tree/kiwispray-$(VERSION) && \
		{ $(CARGO) vendor --offline --locked --versioned-dirs cargo-vendor >/dev/null 2>&1 || \
		  $(CARGO) vendor --locked --versioned-dirs cargo-vendor >/dev/null; }
	tar -czf $(RPM_TOPDIR)/SOURCES/kiwispray-$(VERSION)-vendor.tar.gz \
		-C $(RPM_TOPDIR)/tree/kiwispray-$(VERSION) cargo-vendor
	rpmbuild --nodeps --define "_topdir $(RPM_TOPDIR)" \
		--define "cargo_target_dir $(RPM_TOPDIR)/cargo-target" \
		-ba $(RPM_TOPDIR)/tree/kiwispray-$(VERSION)/kiwispray.spec
	@for f in $(RPM_TOPDIR)/SRPMS/*.rpm $(RPM_TOPDIR)/RPMS/*/*.rpm; do echo "built $$f"; done
