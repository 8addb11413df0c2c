-- PLACEHOLDER on the `tokens` branch only, so that 0005 applies (the
-- migrations must be numbered 1..n): the real file comes from the branch that
-- owns this number; at merge, keep theirs and drop this one.
SELECT 1;
