# Everyday commands. `make run` and `make test` are all a newcomer needs (see README.md).
# Each target installs what it needs first (scripts/install-deps.sh is quiet when all is present).

CARGO ?= cargo
DEPS := scripts/install-deps.sh

.PHONY: help run test test-deploy package bench bench-micro fmt fmt-check lint doc check fuzz samples deps fleet-up fleet-down

## help: list the targets (the default)
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

## run: build (release) and serve the sample originals on :7000, status on :7001
run:
	$(DEPS) build
	$(CARGO) run --release -- -e development serve

## test: unit, integration and bench smoke tests (dev profile: no long release build)
test:
	$(DEPS) test
	$(CARGO) test --all-targets

## package: the Debian package (cargo-deb, installed if missing) in target/debian/
package:
	$(DEPS) build
	@command -v cargo-deb >/dev/null || $(CARGO) install cargo-deb --locked
	$(CARGO) deb --strip

## fleet-up: FLEET_N (3) instances of the release build behind nginx with a shared store, on loopback (deploy/fleet/)
FLEET_N ?= 3
fleet-up:
	$(DEPS) test
	scripts/fleet.sh up $(FLEET_N)

## fleet-down: stop what fleet-up started
fleet-down:
	scripts/fleet.sh down

## test-deploy: the deployment checks, slower than make test: builds the package, lists it, verifies the unit
test-deploy: package
	scripts/test-deploy.sh

## bench: load benchmark of the release server on loopback, one table (BENCH_QUICK=1: 2 s smoke run)
bench:
	$(DEPS) build bench
	scripts/bench.sh

## bench-micro: criterion benchmarks of the render and the URL parser
bench-micro:
	$(DEPS) build
	$(CARGO) bench --bench render --bench parse

## fmt: format the code
fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

## lint: clippy, warnings are errors
lint:
	$(DEPS) build
	$(CARGO) clippy --all-targets -- -D warnings

## doc: API docs, warnings (broken links, missing docs) are errors
doc:
	$(DEPS) build
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

## check: everything CI checks: format, lint, docs, tests
check: fmt-check lint doc test

## fuzz: run each cargo-fuzz target (fuzz/) for FUZZ_SECONDS (default 60); needs the nightly toolchain
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= url_parser decode
fuzz:
	$(DEPS) test
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal || { \
	  echo "make fuzz: cargo-fuzz needs the nightly toolchain, which could not be installed here." >&2; \
	  echo "           The targets are in fuzz/fuzz_targets; run them on a machine with nightly." >&2; exit 1; }
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@# Seeds: a few tiny valid images (the decode target) and example URLs (fuzz/seeds/url_parser).
	@mkdir -p fuzz/corpus/decode fuzz/corpus/url_parser
	@for f in jpg png gif webp; do [ -s fuzz/corpus/decode/seed.$$f ] || vips black fuzz/corpus/decode/seed.$$f 12 8; done
	@for t in $(FUZZ_TARGETS); do \
	  echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  extra=""; [ -d fuzz/seeds/$$t ] && extra=fuzz/seeds/$$t; \
	  $(CARGO) +nightly fuzz run $$t fuzz/corpus/$$t $$extra -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=10 || exit 1; \
	done

## samples: regenerate samples/ (deterministic; commit the result)
samples:
	$(DEPS) test
	scripts/make-samples.sh

## deps: install every dependency (build, test, bench)
deps:
	$(DEPS) all
