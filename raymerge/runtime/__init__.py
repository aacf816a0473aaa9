"""Running merges on Ray: operators from headers, worker actors, the executor, the merge driver."""
