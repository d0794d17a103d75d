-- Sample users for the compose stack's warehouse.
CREATE TABLE users (
    id bigint PRIMARY KEY,
    email text,
    first_name text,
    plan text,
    signed_up_at timestamptz,
    newsletter boolean
);
INSERT INTO users
SELECT g, 'user' || g || '@example.com', 'User ' || g,
       (ARRAY['free', 'pro', 'team'])[1 + g % 3],
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 day', g % 2 = 0
  FROM generate_series(1, 200) AS g;
