"""One typed configuration: the schema, and loading it from files and the command line."""
