# Convenience wrappers; the scripts are the contract (see README.md).
.PHONY: demo test unit integration sanity lint molecule
demo:
	./scripts/demo.sh
test:
	./scripts/test.sh
unit integration sanity lint molecule:
	./scripts/test.sh $@
