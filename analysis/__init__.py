"""Analysis: rank-allocation dashboards and paper tables from run records."""
