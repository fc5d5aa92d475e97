-- A small schema for the examples and tests; written to run on PostgreSQL and SQLite alike.
CREATE TABLE users (
    id    BIGINT PRIMARY KEY,
    name  TEXT   NOT NULL,
    email TEXT   NOT NULL UNIQUE
);

CREATE TABLE sessions (
    token   TEXT   PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users (id)
);
