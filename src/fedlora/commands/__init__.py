"""One module per CLI command; each is thin: parse options, call one library function, print."""
