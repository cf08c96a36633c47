"""The configuration: the plain-data model, the YAML source with line numbers, field readers, the parser."""
