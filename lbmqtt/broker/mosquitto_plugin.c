/*
 * lbmqtt's Mosquitto plugin: the two rules of the embedded broker that Mosquitto's
 * password_file and acl_file cannot give (Mosquitto 2.0, plugin API v5).
 *
 *   1. A forbidden subscription is refused in the SUBACK (0x80), as the embedded broker
 *      does. Mosquitto's acl_file grants every subscription and filters what it delivers,
 *      so a client cannot tell that it will never see a message.
 *   2. A client id belongs to the login that holds it (connected, or with a persistent
 *      session): another login presenting it is refused at CONNECT (CONNACK 5) and the
 *      holder stays connected. Mosquitto alone hands the connection over to anyone.
 *
 * Everything else stays with password_file and acl_file: this plugin returns
 * MOSQ_ERR_PLUGIN_DEFER for what it allows, and Mosquitto asks them next.
 *
 * The rules are read from the ACL that `lbmqtt user mosquitto` generates (the same file as
 * acl_file: `user NAME`, `topic MODE TOPIC`, `pattern MODE TOPIC` with %u and %c), given
 * as `plugin_opt_acl_file`, and read again on SIGHUP. A subscription is allowed when every
 * topic it can match is within a `read` or `readwrite` rule of the login
 * (lbmqtt.access.filter_within, the embedded broker's test).
 *
 * Build: `lbmqtt user mosquitto --plugin` (cc and Debian's mosquitto-dev and
 *   libmosquitto-dev), or
 *   cc -shared -fPIC -O2 -o lbmqtt_mosquitto.so mosquitto_plugin.c
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define MAX_LINE 4096

struct rule {
	char *user; /* NULL: a pattern, for every login */
	char *topic;
	struct rule *next;
};

struct claim {
	char *id;
	char *user;
	const struct mosquitto *client; /* NULL once it left with a persistent session */
	struct claim *next;
};

static mosquitto_plugin_id_t *plugin_id;
static char *acl_path;
static struct rule *rules;
static struct claim *claims;

static char *copy(const char *s)
{
	size_t n = strlen(s) + 1;
	char *out = malloc(n);
	if(out) memcpy(out, s, n);
	return out;
}

static void free_rules(void)
{
	while(rules){
		struct rule *next = rules->next;
		free(rules->user);
		free(rules->topic);
		free(rules);
		rules = next;
	}
}

static char *trim(char *s)
{
	char *end;
	while(*s == ' ' || *s == '\t') s++;
	end = s + strlen(s);
	while(end > s && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' || end[-1] == '\t')) end--;
	*end = '\0';
	return s;
}

/* Reads the read rules of the ACL file; on an error keeps no rules (every subscription is
 * then refused: failing closed) and says so in Mosquitto's log. */
static int load_rules(void)
{
	char line[MAX_LINE];
	char *user = NULL;
	struct rule **tail = &rules;
	FILE *f;

	free_rules();
	f = fopen(acl_path, "r");
	if(!f){
		mosquitto_log_printf(MOSQ_LOG_ERR, "lbmqtt: cannot read %s: every subscription is refused", acl_path);
		return MOSQ_ERR_UNKNOWN;
	}
	while(fgets(line, sizeof(line), f)){
		char *s = trim(line);
		bool pattern = false;
		char *mode, *topic;
		struct rule *r;

		if(*s == '\0' || *s == '#') continue;
		if(!strncmp(s, "user ", 5)){
			free(user);
			user = copy(trim(s + 5));
			continue;
		}
		if(!strncmp(s, "pattern ", 8)){
			pattern = true;
			s += 8;
		}else if(!strncmp(s, "topic ", 6)){
			s += 6;
		}else{
			continue;
		}
		mode = trim(s);
		topic = strchr(mode, ' ');
		if(!topic) continue;
		*topic++ = '\0';
		topic = trim(topic);
		if(strcmp(mode, "read") && strcmp(mode, "readwrite")) continue;
		if(!pattern && !user) continue; /* a topic line before any user: Mosquitto's anonymous rules */
		r = calloc(1, sizeof(*r));
		if(!r) break;
		r->user = pattern ? NULL : copy(user);
		r->topic = copy(topic);
		*tail = r;
		tail = &r->next;
	}
	free(user);
	fclose(f);
	return MOSQ_ERR_SUCCESS;
}

/* Every topic `req` can match is matched by `allowed` (lbmqtt.access.filter_within). */
static bool filter_within(const char *req, const char *allowed)
{
	for(;;){
		size_t rl = strcspn(req, "/"), al = strcspn(allowed, "/");
		if(al == 1 && allowed[0] == '#') return true;
		if(rl == 1 && req[0] == '#') return false;
		if(!(al == 1 && allowed[0] == '+') && (rl != al || strncmp(req, allowed, rl))) return false;
		req += rl;
		allowed += al;
		if(*allowed == '\0') return *req == '\0';
		if(*req == '\0'){
			/* `a` is within `a/#` */
			return !strcmp(allowed, "/#");
		}
		req++;
		allowed++;
	}
}

/* `pattern` with %u and %c filled in, or NULL when a value could widen it (a wildcard or a
 * '/' in it: lbmqtt.access.render). */
static char *render(const char *pattern, const char *user, const char *id)
{
	size_t n = 1;
	const char *p;
	char *out, *o;

	for(p = pattern; *p; p++){
		if(p[0] == '%' && (p[1] == 'u' || p[1] == 'c')){
			const char *v = p[1] == 'u' ? user : id;
			if(!v || !*v || strpbrk(v, "/+#")) return NULL;
			n += strlen(v);
			p++;
		}else{
			n++;
		}
	}
	out = o = malloc(n);
	if(!out) return NULL;
	for(p = pattern; *p; p++){
		if(p[0] == '%' && (p[1] == 'u' || p[1] == 'c')){
			const char *v = p[1] == 'u' ? user : id;
			size_t l = strlen(v);
			memcpy(o, v, l);
			o += l;
			p++;
		}else{
			*o++ = *p;
		}
	}
	*o = '\0';
	return out;
}

static bool may_subscribe(const char *user, const char *id, const char *filter)
{
	const struct rule *r;

	if(filter[0] == '$') return false;
	for(r = rules; r; r = r->next){
		if(r->user){
			if(user && !strcmp(r->user, user) && filter_within(filter, r->topic)) return true;
		}else{
			char *t = render(r->topic, user, id);
			bool ok = t && filter_within(filter, t);
			free(t);
			if(ok) return true;
		}
	}
	return false;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *user;
	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;
	user = mosquitto_client_username(ed->client);
	if(may_subscribe(user, mosquitto_client_id(ed->client), ed->topic)) return MOSQ_ERR_PLUGIN_DEFER;
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "lbmqtt: subscription of %s to %s refused",
			user ? user : "(anonymous)", ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

static void add_claim(const char *id, const char *user, const struct mosquitto *client)
{
	struct claim *c = calloc(1, sizeof(*c));
	if(!c) return;
	c->id = copy(id);
	c->user = copy(user);
	c->client = client;
	c->next = claims;
	claims = c;
}

/* One claim per connection that presented the id (and one, with no connection, for a
 * persistent session left behind): all of them the same login's. */
static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *id = mosquitto_client_id(ed->client);
	const struct claim *c;
	(void)event;
	(void)userdata;

	if(!id || !ed->username) return MOSQ_ERR_PLUGIN_DEFER; /* the password file refuses it */
	for(c = claims; c; c = c->next){
		if(!strcmp(c->id, id) && strcmp(c->user, ed->username)){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"lbmqtt: login %s refused: its client id belongs to another login", ed->username);
			return MOSQ_ERR_AUTH;
		}
	}
	/* The id is this login's from here (the password file decides next); if the login is
	 * refused, its disconnect below releases this claim and no other. */
	add_claim(id, ed->username, ed->client);
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	const char *id = mosquitto_client_id(ed->client);
	struct claim **p = &claims;
	(void)event;
	(void)userdata;

	while(*p){
		struct claim *c = *p;
		const struct claim *o;
		bool kept = false;

		if(c->client != ed->client){
			p = &c->next;
			continue;
		}
		/* A refused login has lost its id by now. A persistent session stays the login's:
		 * this claim stays, without a connection, unless another one of its id does. */
		if(id && !mosquitto_client_clean_session(ed->client)){
			kept = true;
			for(o = claims; o; o = o->next){
				if(o != c && !strcmp(o->id, c->id)) kept = false;
			}
		}
		if(kept){
			c->client = NULL;
			p = &c->next;
			continue;
		}
		*p = c->next;
		free(c->id);
		free(c->user);
		free(c);
	}
	return MOSQ_ERR_SUCCESS;
}

static int on_reload(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	(void)userdata;
	load_rules();
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	int i;
	(void)userdata;

	plugin_id = identifier;
	for(i = 0; i < option_count; i++){
		if(!strcmp(options[i].key, "acl_file")) acl_path = copy(options[i].value);
	}
	if(!acl_path){
		mosquitto_log_printf(MOSQ_LOG_ERR, "lbmqtt: plugin_opt_acl_file is missing");
		return MOSQ_ERR_INVAL;
	}
	if(load_rules() != MOSQ_ERR_SUCCESS) return MOSQ_ERR_INVAL;
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL)
			|| mosquitto_callback_register(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL, NULL)){
		return MOSQ_ERR_UNKNOWN;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_RELOAD, on_reload, NULL);
	free_rules();
	while(claims){
		struct claim *next = claims->next;
		free(claims->id);
		free(claims->user);
		free(claims);
		claims = next;
	}
	free(acl_path);
	acl_path = NULL;
	return MOSQ_ERR_SUCCESS;
}
