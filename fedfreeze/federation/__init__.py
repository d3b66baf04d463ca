"""Federation: what sites exchange with the coordinator, and how their results are combined."""
