-- A run log as t2v wrote it before its schema was in Alembic migrations (commit 83dd121), for
-- tests/test_migrations.py. @ROOT@ stands for the folder it lives in (the test's tmp_path).
--
-- Made with that commit's code (T2V_DATA_DIR=@ROOT@/data):
--   T2V_INJECT_OOM='sea/decode:*' t2v nightly --catalogue @ROOT@/cat.toml --model tiny   (fox ok, sea failed)
--   t2v generate "an owl at dusk" --height 64 --width 96 --frames 9 --steps 2 --out @ROOT@/owl.mp4
--   sqlite3 @ROOT@/data/runlog.sqlite .dump
-- (cat.toml: [defaults] height 64, width 96, frames 9, steps 2; templates fox and sea.)
-- Added by hand at the end: a night logged by a release before the last stage was renamed
-- (its last row is "watermark") and before runs kept their job specs (jobs_json NULL).
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE runs (
	id VARCHAR(32) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	started DATETIME NOT NULL, 
	finished DATETIME, 
	status VARCHAR(16) NOT NULL, 
	model TEXT NOT NULL, 
	catalogue TEXT, 
	parent_run_id VARCHAR(32), 
	pid INTEGER NOT NULL, 
	host TEXT NOT NULL, 
	jobs_json TEXT, 
	PRIMARY KEY (id)
);
INSERT INTO runs VALUES('c3ba1d396eb2416284e64f8d422cd773','nightly','2026-12-01 23:56:11.408916','2026-12-01 23:56:13.489230','failed','tiny','@ROOT@/cat.toml',NULL,14997,'vm','{"format": 1, "fp8_storage": false, "jobs": [{"fps": 24, "frames": 9, "guidance": 5.0, "height": 64, "negative_prompt": "blurry, low quality, jpeg artifacts, watermark, text, static, still frame, worst quality, deformed, disfigured, extra fingers, messy background", "prompt": "a red fox running through snow", "seed": 0, "step_cache": 0.0, "steps": 2, "template": "fox", "watermark": {"corner": "bottom-right", "image": null, "margin": 0.03, "opacity": 0.85, "scale": 0.12, "text": "t2v"}, "width": 96}, {"fps": 24, "frames": 9, "guidance": 5.0, "height": 64, "negative_prompt": "blurry, low quality, jpeg artifacts, watermark, text, static, still frame, worst quality, deformed, disfigured, extra fingers, messy background", "prompt": "waves breaking on a rocky shore", "seed": 0, "step_cache": 0.0, "steps": 2, "template": "sea", "watermark": {"corner": "bottom-right", "image": null, "margin": 0.03, "opacity": 0.85, "scale": 0.12, "text": "t2v"}, "width": 96}], "outputs_dir": "@ROOT@/data/outputs/2026-12-01"}');
INSERT INTO runs VALUES('ff87cef5cca040deb8bdfdb6e90f96f4','generate','2026-12-01 23:56:36.578423','2026-12-01 23:56:40.021117','ok','tiny',NULL,NULL,15197,'vm',NULL);
CREATE TABLE stage_runs (
	id INTEGER NOT NULL, 
	run_id VARCHAR(32) NOT NULL, 
	job_key VARCHAR(128) NOT NULL, 
	template TEXT NOT NULL, 
	stage VARCHAR(16) NOT NULL, 
	model TEXT NOT NULL, 
	"plan" TEXT, 
	attempt INTEGER NOT NULL, 
	started DATETIME NOT NULL, 
	finished DATETIME, 
	wall_s FLOAT, 
	peak_allocated_gib FLOAT, 
	peak_reserved_gib FLOAT, 
	peak_nvml_gib FLOAT, 
	peak_rss_gib FLOAT, 
	peak_cgroup_gib FLOAT, 
	status VARCHAR(16) NOT NULL, 
	error TEXT, 
	output_key TEXT, 
	pid INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(run_id) REFERENCES runs (id)
);
INSERT INTO stage_runs VALUES(1,'c3ba1d396eb2416284e64f8d422cd773','197ea4c728e9eb0359579cc8c530935f','fox','encode','tiny-wan2.2-ti2v@seed2022-v1','encode:cpu',1,'2026-12-01 23:56:11.518150','2026-12-01 23:56:12.652472',1.0632106559996827854,NULL,NULL,NULL,0.5438385009765625,0.744476318359375,'ok',NULL,'67f84edaf41185980cbe86b857aee5b0',14997);
INSERT INTO stage_runs VALUES(2,'c3ba1d396eb2416284e64f8d422cd773','7cdbecfe6d4e44b571a408a2bbd0f4bd','sea','encode','tiny-wan2.2-ti2v@seed2022-v1','encode:cpu',1,'2026-12-01 23:56:12.638742','2026-12-01 23:56:12.762090',0.11188501499964331742,NULL,NULL,NULL,0.5520477294921875,0.75310516357421875,'ok',NULL,'9b210aadff4dee3d3b9da09f0deec390',14997);
INSERT INTO stage_runs VALUES(3,'c3ba1d396eb2416284e64f8d422cd773','197ea4c728e9eb0359579cc8c530935f','fox','diffuse','tiny-wan2.2-ti2v@seed2022-v1','diffuse:cpu-cfg2',1,'2026-12-01 23:56:12.807147','2026-12-01 23:56:12.930726',0.11334507799983839504,NULL,NULL,NULL,0.561931610107421875,0.754924774169921875,'ok',NULL,'c85786d347aa47f9e285c168a50454b5',14997);
INSERT INTO stage_runs VALUES(4,'c3ba1d396eb2416284e64f8d422cd773','7cdbecfe6d4e44b571a408a2bbd0f4bd','sea','diffuse','tiny-wan2.2-ti2v@seed2022-v1','diffuse:cpu-cfg2',1,'2026-12-01 23:56:12.927604','2026-12-01 23:56:12.986780',0.046292845000607485417,NULL,NULL,NULL,0.56201934814453125,0.755126953125,'ok',NULL,'a6330d47eed36f310645d3d320802306',14997);
INSERT INTO stage_runs VALUES(5,'c3ba1d396eb2416284e64f8d422cd773','197ea4c728e9eb0359579cc8c530935f','fox','decode','tiny-wan2.2-ti2v@seed2022-v1','decode:cpu-fp32-whole',1,'2026-12-01 23:56:13.006249','2026-12-01 23:56:13.248535',0.20841927499986923066,NULL,NULL,NULL,0.57360076904296875,0.76348114013671875,'ok',NULL,'bab333e29c55ff5baa50fd5ece08407f',14997);
INSERT INTO stage_runs VALUES(6,'c3ba1d396eb2416284e64f8d422cd773','7cdbecfe6d4e44b571a408a2bbd0f4bd','sea','decode','tiny-wan2.2-ti2v@seed2022-v1','decode:cpu-fp32-whole',1,'2026-12-01 23:56:13.155924','2026-12-01 23:56:13.172096',0.0036812999996982398442,NULL,NULL,NULL,0.57360076904296875,0.76787567138671875,'failed','OutOfMemoryError: injected by T2V_INJECT_OOM=''sea/decode:*''',NULL,14997);
INSERT INTO stage_runs VALUES(7,'c3ba1d396eb2416284e64f8d422cd773','7cdbecfe6d4e44b571a408a2bbd0f4bd','sea','decode','tiny-wan2.2-ti2v@seed2022-v1','decode:cpu-fp32-tile64',2,'2026-12-01 23:56:13.185599','2026-12-01 23:56:13.200516',0.003707830000166723039,NULL,NULL,NULL,0.5736083984375,0.7674407958984375,'failed','OutOfMemoryError: injected by T2V_INJECT_OOM=''sea/decode:*''',NULL,14997);
INSERT INTO stage_runs VALUES(8,'c3ba1d396eb2416284e64f8d422cd773','197ea4c728e9eb0359579cc8c530935f','fox','finish','tiny-wan2.2-ti2v@seed2022-v1',NULL,1,'2026-12-01 23:56:13.289397','2026-12-01 23:56:13.471464',0.17398702100035734474,NULL,NULL,NULL,0.5738983154296875,0.77739715576171875,'ok',NULL,'197ea4c728e9eb0359579cc8c530935f',14997);
INSERT INTO stage_runs VALUES(9,'ff87cef5cca040deb8bdfdb6e90f96f4','433d7f3d21006c26ee7ef4d96df9cb10','an-owl-at-dusk-433d7f3d','encode','tiny-wan2.2-ti2v@seed2022-v1','encode:cpu',1,'2026-12-01 23:56:36.734384','2026-12-01 23:56:38.036767',1.2763190249997933278,NULL,NULL,NULL,0.53636932373046875,0.736942291259765625,'ok',NULL,'74af3314b92845a82908a9a965d0ec55',15197);
INSERT INTO stage_runs VALUES(10,'ff87cef5cca040deb8bdfdb6e90f96f4','433d7f3d21006c26ee7ef4d96df9cb10','an-owl-at-dusk-433d7f3d','diffuse','tiny-wan2.2-ti2v@seed2022-v1','diffuse:cpu-cfg2',1,'2026-12-01 23:56:38.066205','2026-12-01 23:56:38.829456',0.74900405100015632342,NULL,NULL,NULL,0.54126739501953125,0.733066558837890625,'ok',NULL,'05c8a4359c36a5dad0fb2ce93c9c88b7',15197);
INSERT INTO stage_runs VALUES(11,'ff87cef5cca040deb8bdfdb6e90f96f4','433d7f3d21006c26ee7ef4d96df9cb10','an-owl-at-dusk-433d7f3d','decode','tiny-wan2.2-ti2v@seed2022-v1','decode:cpu-fp32-whole',1,'2026-12-01 23:56:38.846828','2026-12-01 23:56:39.854982',1.0037028669994469964,NULL,NULL,NULL,0.547931671142578125,0.736194610595703125,'ok',NULL,'a2b4d0c221eb4c2d2e2110f479a49ea0',15197);
INSERT INTO stage_runs VALUES(12,'ff87cef5cca040deb8bdfdb6e90f96f4','433d7f3d21006c26ee7ef4d96df9cb10','an-owl-at-dusk-433d7f3d','finish','tiny-wan2.2-ti2v@seed2022-v1',NULL,1,'2026-12-01 23:56:39.875247','2026-12-01 23:56:40.008444',0.12620468400018580723,NULL,NULL,NULL,0.548152923583984375,0.748783111572265625,'ok',NULL,'433d7f3d21006c26ee7ef4d96df9cb10',15197);
CREATE INDEX ix_stage_runs_run_id ON stage_runs (run_id);
CREATE INDEX ix_stage_runs_job_key ON stage_runs (job_key);
INSERT INTO runs VALUES('5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b','nightly','2026-11-30 02:00:00.000000','2026-11-30 02:00:09.500000','ok','tiny','@ROOT@/cat.toml',NULL,4242,'old-host',NULL);
INSERT INTO stage_runs VALUES(13,'5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b','0f0e0d0c0b0a09080706050403020100','fox','encode','tiny-wan2.2-ti2v@seed2022-v1','encode:cpu',1,'2026-11-30 02:00:01.000000','2026-11-30 02:00:02.000000',1.0,NULL,NULL,NULL,0.5,NULL,'ok',NULL,'11111111111111111111111111111111',4242);
INSERT INTO stage_runs VALUES(14,'5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b','0f0e0d0c0b0a09080706050403020100','fox','diffuse','tiny-wan2.2-ti2v@seed2022-v1','diffuse:cpu-cfg2',1,'2026-11-30 02:00:02.000000','2026-11-30 02:00:05.000000',3.0,NULL,NULL,NULL,0.5,NULL,'ok',NULL,'22222222222222222222222222222222',4242);
INSERT INTO stage_runs VALUES(15,'5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b','0f0e0d0c0b0a09080706050403020100','fox','decode','tiny-wan2.2-ti2v@seed2022-v1','decode:cpu-fp32-whole',1,'2026-11-30 02:00:05.000000','2026-11-30 02:00:08.000000',3.0,NULL,NULL,NULL,0.5,NULL,'ok',NULL,'33333333333333333333333333333333',4242);
INSERT INTO stage_runs VALUES(16,'5e0f6c1a9b2d4e7f8a3c1b0d9e8f7a6b','0f0e0d0c0b0a09080706050403020100','fox','watermark','tiny-wan2.2-ti2v@seed2022-v1',NULL,1,'2026-11-30 02:00:08.000000','2026-11-30 02:00:09.000000',1.0,NULL,NULL,NULL,0.5,NULL,'ok',NULL,'44444444444444444444444444444444',4242);
COMMIT;
