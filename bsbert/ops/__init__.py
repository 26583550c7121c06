"""Python side of bsbert's ops: backends (what each supports and why not), the dispatcher, fakes."""
