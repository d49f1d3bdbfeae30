"""mailgw's tests: unit/ in-process, integration/ against real peers, support/ what they share."""
