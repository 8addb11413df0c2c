-- PLACEHOLDER on the `penalties` branch only, so that 0003 applies (the
-- migrations must be numbered 1..n): the real 0002 comes from the mailbox
-- locks branch; at merge, keep theirs and drop this file.
SELECT 1;
