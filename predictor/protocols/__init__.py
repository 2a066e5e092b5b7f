"""Protocol adapters: one module per wire protocol, each turning its requests into engine requests."""
